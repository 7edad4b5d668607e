import sys

from vmsim.host.main import main

sys.exit(main())

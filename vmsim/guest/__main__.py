import sys

from vmsim.guest.main import main

sys.exit(main())

from vmsim.cli import main

main()

from mhr.cli import main

main()

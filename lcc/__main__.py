from lcc.cli import main

main()

from recharged.cli import main

main()

from fzpoll.cli import main

raise SystemExit(main())

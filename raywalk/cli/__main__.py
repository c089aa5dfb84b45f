from raywalk.cli import main

raise SystemExit(main())

from loracls.cli import main

raise SystemExit(main())

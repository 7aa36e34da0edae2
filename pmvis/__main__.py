from pmvis.cli import main

raise SystemExit(main())

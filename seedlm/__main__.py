from seedlm.cli import main

raise SystemExit(main())

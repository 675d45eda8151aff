from minbert.experiments.command import main

raise SystemExit(main())

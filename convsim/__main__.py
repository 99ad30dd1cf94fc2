"""`python -m convsim ...` is the same as the `convsim` console command."""

from convsim.cli import main

raise SystemExit(main())

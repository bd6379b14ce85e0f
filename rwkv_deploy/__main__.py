"""`python -m rwkv_deploy ...` is the same as the `rwkv-deploy` command."""
import sys

from .cli import main

sys.exit(main())

import sys

from client.gateway.cli import main

sys.exit(main())

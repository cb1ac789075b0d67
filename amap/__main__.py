"""``python -m amap`` is the same as the ``amap`` command."""
from amap.cli import main

if __name__ == '__main__':
    raise SystemExit(main())

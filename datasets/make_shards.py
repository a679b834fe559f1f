"""Turn an A1111 dataset folder into webdataset shards: `python datasets/make_shards.py SRC DST [options]`.

The same as `hyperlit make-shards SRC DST [options]` (see `hyperlit make-shards --help`). With `--model tiny` (or
`--model sd15 --model-path ...`), each sample also carries its precomputed VAE posterior and encoded fixed prompt,
so training skips both encoders.
"""

import sys

from hyperlit.cli import main

if __name__ == "__main__":
    sys.exit(main(["make-shards", *sys.argv[1:]]))

"""Turn an A1111 dataset folder into webdataset shards: `python datasets/make_shards.py SRC DST [options]`.

With `--model tiny` (or another hyperlit model config name plus `--model-path`), each sample also carries its
precomputed VAE posterior and encoded fixed prompt, so training skips both encoders.
"""

from __future__ import annotations

import argparse
import logging
import os

from hyperlit.data.shards import make_shards


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("src", help="A1111 folder: images with optional same-stem .txt captions")
    parser.add_argument("dst", help="output directory for <prefix>-000000.tar ...")
    parser.add_argument("--samples-per-shard", type=int, default=1000)
    parser.add_argument("--prefix", default="shard")
    parser.add_argument("--model", default=None, help="model family to precompute latents/context (e.g. tiny)")
    parser.add_argument("--model-path", default=None, help="checkpoint path for non-embedded models")
    parser.add_argument("--resolution", type=int, default=512)
    parser.add_argument("--resize", default="crop", choices=("crop", "stretch"))
    parser.add_argument("--template", default="style_filewords")
    parser.add_argument("--name", default="hypernetwork", help="the [name] in template lines")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    encoder = None
    if args.model:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        from hyperlit.models import load_components

        kwargs = {"family": args.model}
        if args.model_path:
            kwargs["path"] = args.model_path
        encoder = load_components(**kwargs)
    paths = make_shards(
        args.src,
        args.dst,
        encoder=encoder,
        resolution=args.resolution,
        resize=args.resize,
        template=args.template,
        name=args.name,
        samples_per_shard=args.samples_per_shard,
        prefix=args.prefix,
    )
    print(f"wrote {len(paths)} shard(s): {paths[0]} ... {paths[-1]}")


if __name__ == "__main__":
    main()

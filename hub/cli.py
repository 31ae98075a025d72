"""Command line for bundle authors and users (run `python -m hub --help` from the checkout; docs/HUB.md).

    card BUNDLE [--reference REF] [--out DIR] [--catalog FILE] [--title T] [--license L] [--base-model M]
        write the bundle card (README.md) and, with --reference, its catalog entry (printed; added to FILE)
    list [--family F] [--catalog FILE ...]
        the catalog entries that fit a model family
    fetch REFERENCE [--models DIR]
        download and verify a bundle into DIR/hub/... (DIR: a models/sparse_attention folder)
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .errors import HubError


def _card(args) -> int:
    from .card import write_card
    from .catalog import add_entry

    if args.catalog and not args.reference:
        raise SystemExit("--catalog needs --reference: a catalog entry says where the bundle is published")
    readme, meta, entry = write_card(args.bundle, out_dir=args.out, reference=args.reference, title=args.title,
                                     license=args.license, base_model=args.base_model)
    print(f"wrote {readme} (sha256 {meta['sha256']}, {meta['size_bytes']} bytes)")
    if entry is not None:
        print("catalog entry:")
        print(json.dumps(entry.to_dict(), indent=2))
        if args.catalog:
            print(f"added to {add_entry(args.catalog, entry)}")
        print(f"reference: {entry.pinned_reference()}")
    return 0


def _list(args) -> int:
    from .catalog import SHIPPED, for_family, read_catalogs

    entries = for_family(read_catalogs(args.catalog or [SHIPPED]), args.family)
    for e in entries:
        print(f"{e.label()}\n    {e.describe()}\n    {e.pinned_reference()}")
    if not entries:
        print("no catalog entries" + (f" for family {args.family}" if args.family else ""))
    return 0


def _fetch(args) -> int:
    from .fetch import fetch_bundle

    bundle, got = fetch_bundle(args.reference, args.models)
    print(f"{got.path} ({'downloaded' if got.downloaded else 'already there'}, sha256 {got.sha256})")
    print(bundle.summary())
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m hub", description="CalibAtt mask bundles on a community hub "
                                "(docs/HUB.md).")
    sub = p.add_subparsers(dest="command", required=True)
    c = sub.add_parser("card", help="write a bundle's README.md card (and catalog entry)")
    c.add_argument("bundle", help="the bundle .safetensors file")
    c.add_argument("--reference", help="where it is published, e.g. hf://owner/repo/file.safetensors@<commit>")
    c.add_argument("--out", help="folder for README.md (default: the bundle's folder)")
    c.add_argument("--catalog", help="catalog JSON file to add the entry to (created if absent)")
    c.add_argument("--title")
    c.add_argument("--license", help="license id for the card metadata, e.g. apache-2.0")
    c.add_argument("--base-model", help="the model's Hub id, e.g. Wan-AI/Wan2.1-T2V-1.3B")
    c.set_defaults(run=_card)
    ls = sub.add_parser("list", help="catalog entries for a model family")
    ls.add_argument("--family", help="wan21, wan22, hunyuan, ltxv, mochi")
    ls.add_argument("--catalog", action="append", help="catalog file (repeatable; default: the shipped one)")
    ls.set_defaults(run=_list)
    f = sub.add_parser("fetch", help="download and verify a bundle")
    f.add_argument("reference")
    f.add_argument("--models", default="models/sparse_attention",
                   help="a models/sparse_attention folder (default: ./models/sparse_attention)")
    f.set_defaults(run=_fetch)
    args = p.parse_args(argv)
    try:
        return args.run(args)
    except HubError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except (OSError, ValueError) as e:  # BundleError is a ValueError: the loader's message names the field
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

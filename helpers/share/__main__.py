"""python -m helpers.share RUN_DIR --repo-id user/name: build one run's upload folder and push it to the Hub."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..support.lock import FolderInUse
from .hub import HubCall, HubPushError, build_upload_folder, push_adapter


def main(argv=None) -> list[HubCall] | None:
    ap = argparse.ArgumentParser(prog="python -m helpers.share",
                                 description="Build the upload folder of one trained run and push it to the Hub.")
    ap.add_argument("run_dir", help="notebook 03's runs/<variant>/ folder")
    ap.add_argument("--repo-id", help="user/name on the Hub; without it only the folder is built")
    ap.add_argument("--out", help="upload folder (default RUN_DIR/hub)")
    ap.add_argument("--eval-dir", help="notebook 05's eval/ folder (default: <output root>/eval next to runs/, if any)")
    ap.add_argument("--eval-profile", choices=["full", "tiny"], help="the profile notebook 05 ran with (default: the run's)")
    ap.add_argument("--samples", help="an image to show in the card (e.g. notebook 04's samples/gallery.png)")
    ap.add_argument("--public", action="store_true", help="create a public repo (default: private)")
    ap.add_argument("--dry-run", action="store_true", help="build the folder and print the calls; upload nothing")
    args = ap.parse_args(argv)
    run_dir = Path(args.run_dir)
    eval_dir = Path(args.eval_dir) if args.eval_dir else run_dir.resolve().parent.parent / "eval"
    try:
        folder = build_upload_folder(run_dir, args.out or run_dir / "hub", eval_dir=eval_dir if eval_dir.is_dir() else None,
                                     eval_profile=args.eval_profile, samples=args.samples, repo_id=args.repo_id)
    except (OSError, ValueError, FolderInUse) as e:  # no adapter, stray files, DiskFull, another writer
        raise SystemExit(f"error: {e}") from None
    print(f"Upload folder: {folder} ({', '.join(sorted(p.name for p in folder.iterdir()))})")
    if not args.repo_id:
        print("No --repo-id: nothing pushed.")
        return None
    try:
        calls = push_adapter(folder, args.repo_id, private=not args.public, dry_run=args.dry_run)
    except (ValueError, HubPushError, FolderInUse) as e:  # HubVisibilityError among them: nothing was uploaded
        raise SystemExit(f"error: {e}") from None
    for call in calls:
        print(("would call " if args.dry_run else "called ") + str(call))
    if not args.dry_run:
        print(f"Pushed: https://huggingface.co/{args.repo_id}")
    return calls


if __name__ == "__main__":
    main()

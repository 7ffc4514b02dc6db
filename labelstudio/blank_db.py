"""An empty Label Studio database with every migration applied, made once by `make labelstudio`
with Label Studio's own Python: `.venv-labelstudio/bin/python labelstudio/blank_db.py DIR`.

`rlhf annotate serve` copies it into a new data directory (``rlhf_tasks/labelstudio.py``), so
that a first start takes seconds instead of the ~40 s that Label Studio's migrations take on
SQLite. Nothing instance-specific is kept: the secret key Label Studio writes beside the
database (``.env``) is removed, and each server generates its own.
"""

import os
import shutil
import sys
from pathlib import Path

out = Path(sys.argv[1]).resolve()
shutil.rmtree(out, ignore_errors=True)
out.mkdir(parents=True)
os.environ.update(LABEL_STUDIO_BASE_DATA_DIR=str(out), LATEST_VERSION_CHECK="false", SENTRY_DSN="")

from label_studio.server import _apply_database_migrations, _setup_env  # noqa: E402

_setup_env()
_apply_database_migrations()
for path in out.iterdir():
    if path.name != "label_studio.sqlite3":
        shutil.rmtree(path) if path.is_dir() else path.unlink()
print(f"{out / 'label_studio.sqlite3'}: migrated")

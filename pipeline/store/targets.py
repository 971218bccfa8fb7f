"""Where an output may be written, checked before anything is: a store's location must be empty or
hold a logit store (never a file, a whole bucket or someone else's objects), and neither a store nor
a run folder may lie inside the command's inputs, nor an input inside what ``--overwrite`` removes.
"""

from __future__ import annotations

import os

from dhkd_pipe.errors import DhkdError
from dhkd_pipe.store.bounds import check_local_tree, read_metadata
from dhkd_pipe.store.lock import LOCK_KEY
from dhkd_pipe.store.objects import StoreObjects, is_bucket_root, is_local, is_url, local_path


def check_target(objects: StoreObjects, overwrite: bool = False):
    """Refuses, reading only, a location that holds something other than a logit store: a
    file, a folder or prefix with other objects, another Zarr store. ``--overwrite`` replaces
    only a logit store (a store whose group carries this tool's ``command``)."""
    where = objects.location
    if is_bucket_root(where):
        raise DhkdError(
            f"{where} is a whole bucket: a store there would share it with everything else in it; "
            f"name a prefix such as {where.rstrip('/')}/logits.zarr"
        )
    if objects.is_file():
        raise DhkdError(
            f"{where} is a file, not a logit store; choose another path"
            + (" (--overwrite replaces only a logit store, never a file)" if overwrite else "")
        )
    if is_local(where):  # before anything is read: a FIFO or a link to a device would never end
        check_local_tree(local_path(where), where)
    if not objects.exists("zarr.json"):
        if not objects.is_empty(ignore=(LOCK_KEY,)):
            advice = "refusing to delete it with --overwrite" if overwrite else "choose another path or remove it"
            raise DhkdError(f"{where} exists and is not a logit store; {advice}")
        return
    try:
        meta = read_metadata(objects, "zarr.json")
    except DhkdError:
        meta = None
    if not (
        isinstance(meta, dict) and meta.get("node_type") == "group" and "command" in (meta.get("attributes") or {})
    ):
        advice = "refusing to delete it with --overwrite" if overwrite else "choose another path or remove it"
        raise DhkdError(f"{where} holds a Zarr store that is not a logit store; {advice}")


def check_inputs_outside(location: str, entries: tuple[str, ...], inputs: dict):
    """Refuses an input of the command (``{option: path}``: weights, data) that lies inside the
    entries of the local store at ``location`` that replacing the store would remove, before
    anything is touched."""
    if not is_local(location):
        return
    root = os.path.realpath(local_path(location))
    owned = [os.path.join(root, name) for name in entries]
    for option, path in inputs.items():
        if not path or is_url(path):
            continue
        real = os.path.realpath(str(path).split(":", 1)[-1] if str(path).startswith("imagefolder:") else str(path))
        for target in owned:
            if real == target or real.startswith(target + os.sep):
                raise DhkdError(
                    f"{option} {path} lies inside what --overwrite would remove from the store {location} "
                    f"({os.path.basename(target)}); copy it elsewhere first"
                )


RUN_IN_STORE = "a run folder there would become part of the store"  # check_outside_folders' reason for a run's --out


def check_outside_folders(location: str, folders: dict, why: str = "a store there would become part of the data set"):
    """Refuses a local output at ``location`` (a store, a run folder) that is, or lies inside, one of
    the command's input folders (``{option: folder}``: the data set's, the store's), before anything
    is written: there it would become part of them (an image folder's ``train/`` would take a
    store's objects for a class of images, a store would hold run folders)."""
    if not is_local(location):
        return
    store = os.path.realpath(local_path(location))
    for option, folder in folders.items():
        if not folder or is_url(folder):
            continue
        root = os.path.realpath(folder)
        if store == root or store.startswith(root.rstrip(os.sep) + os.sep):
            raise DhkdError(
                f"--out {location} lies inside the folder of {option} ({folder}): {why}; write it elsewhere"
            )

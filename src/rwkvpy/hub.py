"""Model references: a local path, the demo model, or a file on the Hugging Face Hub.

``resolve_model(spec)`` turns a reference into a local path; every API entry point that takes a
model (``rwkvpy.load``, ``rwkvpy.inspect``, ``convert``, ``merge_lora``) and every CLI verb
resolves through it:

- ``"demo"`` (when no file of that name exists) is the demo model shipped in the package
  (:mod:`rwkvpy.demo`);
- any other path (anything not starting with ``hf:``) is returned as is;
- ``hf:OWNER/REPO/FILE`` (FILE may contain ``/``), or ``hf:OWNER/REPO@REVISION/FILE``, is
  downloaded with ``huggingface_hub.hf_hub_download`` into the Hugging Face cache (or found
  there: a cached file needs no network). The cache's place and the offline mode follow
  huggingface_hub's environment variables (``HF_HOME``, ``HF_HUB_CACHE``, ``HF_HUB_OFFLINE=1``,
  ``HF_TOKEN`` for private or gated repositories).

huggingface_hub is an optional dependency (``pip install 'rwkvpy[hub]'``), imported only when
an ``hf:`` spec is resolved.
"""

from __future__ import annotations

import os

from .errors import RwkvpyError

PREFIX = "hf:"


class HubError(RwkvpyError):
    """An ``hf:`` model spec that cannot be resolved: malformed, huggingface_hub missing, not
    cached while offline, no such repository, revision or file."""


def parse_hf_spec(spec: str):
    """``(repo_id, filename, revision or None)`` of ``hf:OWNER/REPO[@REVISION]/FILE``."""
    body = spec[len(PREFIX) :]
    parts = body.split("/")
    if len(parts) < 3 or not all(parts):
        raise HubError(
            f"{spec}: expected hf:OWNER/REPO/FILE (for example "
            f"hf:BlinkDL/rwkv-7-world/RWKV-x070-World-0.1B-v2.8-20241210-ctx4096.pth)"
        )
    owner, repo, filename = parts[0], parts[1], "/".join(parts[2:])
    revision = None
    if "@" in repo:
        repo, _, revision = repo.partition("@")
        if not repo or not revision:
            raise HubError(f"{spec}: expected hf:OWNER/REPO@REVISION/FILE")
    return f"{owner}/{repo}", filename, revision


def _one_line(e) -> str:
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    return lines[0] if lines else type(e).__name__


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in ("1", "ON", "YES", "TRUE")


#: The model reference of the demo model shipped in the package.
DEMO = "demo"


def resolve_model(spec) -> str:
    """The local path of a model reference (see the module's docstring)."""
    if not isinstance(spec, str):
        return os.fspath(spec)
    if spec == DEMO and not os.path.exists(spec):
        from .demo import demo_model_path

        return os.fspath(demo_model_path())
    if not spec.startswith(PREFIX):
        return spec
    repo_id, filename, revision = parse_hf_spec(spec)
    try:
        import huggingface_hub
        from huggingface_hub import errors as hf_errors
    except ImportError:
        raise HubError(
            f"{spec}: hf: model specs need the huggingface_hub package: "
            f"pip install 'rwkvpy[hub]' (or pip install huggingface_hub)"
        ) from None
    where = f"{repo_id}{'@' + revision if revision else ''}"
    try:
        return huggingface_hub.hf_hub_download(repo_id, filename, revision=revision)
    except hf_errors.LocalEntryNotFoundError:
        from huggingface_hub import constants

        why = (
            "offline mode is on (HF_HUB_OFFLINE)"
            if _offline()
            else "the Hugging Face Hub cannot be reached"
        )
        raise HubError(
            f"{spec}: {filename} of {where} is not in the Hugging Face cache "
            f"({constants.HF_HUB_CACHE}) and {why}: connect once to download "
            f"it"
        ) from None
    except hf_errors.GatedRepoError:
        raise HubError(
            f"{spec}: {repo_id} is gated: accept its terms on huggingface.co and "
            f"log in (hf auth login, or set HF_TOKEN)"
        ) from None
    except hf_errors.RepositoryNotFoundError:
        raise HubError(
            f"{spec}: repository {repo_id} not found on the Hugging Face Hub (or it "
            f"is private: log in with hf auth login, or set HF_TOKEN)"
        ) from None
    except hf_errors.RevisionNotFoundError:
        raise HubError(f"{spec}: revision {revision!r} not found in {repo_id}") from None
    except hf_errors.EntryNotFoundError:
        raise HubError(f"{spec}: no file {filename} in {where}") from None
    except hf_errors.HFValidationError as e:
        raise HubError(f"{spec}: {_one_line(e)}") from None
    except OSError as e:  # HTTP errors, disk full, permissions
        raise HubError(f"{spec}: download failed: {_one_line(e)}") from None

"""What a checkpoint folder is: its name (`checkpoints/step_NNNNNNN`), its record
(trainer_state.json, with the sha256 of every file) and how it is verified. lib/records/checkpoint.py
writes, prunes and loads checkpoints; lib/records/archive.py packs them; both read this."""
from __future__ import annotations

from pathlib import Path

from lib.errors import UserError
from lib.files import check_sha256, folder_digest, read_json

STATE = "trainer_state.json"
PREFIX = "step_"
RANDOM_STATE = "random_states_{}.pkl"  # Accelerate's random state of each process
SHARDS = "pytorch_model_fsdp_0"  # where Accelerate writes an FSDP model's shards (torch.distributed.checkpoint)


def step_dir(run_dir: str | Path, step: int) -> Path:
    """Where the checkpoint of `step` lives (complete or not)."""
    return Path(run_dir) / "checkpoints" / f"{PREFIX}{step:07d}"


def complete_checkpoints(run_dir: str | Path) -> list[Path]:
    """Complete checkpoint folders of a run, oldest first."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir()
             if p.is_dir() and p.name.startswith(PREFIX) and p.name[len(PREFIX):].isdigit()
             and (p / STATE).is_file()]
    return sorted(found, key=_step_of)


def _step_of(path: Path) -> int:
    """The step of a checkpoint folder or archive by its name (`step_0000400`, `.tar.gz`, ...)."""
    return int(path.name[len(PREFIX):].split(".")[0])


REQUIRED = {"step": int, "tokens_seen": int, "sampler": dict, "data_content_hash": str, "files": dict}


def verify(path: Path) -> dict:
    """Read a checkpoint's record, check it is whole (the fields a resume needs, its own step,
    the model's files listed) and every listed file's sha256; a UserError says what is wrong."""
    path = Path(path)
    state_file = path / STATE
    if not state_file.is_file():
        raise UserError(f"{path} is not a complete checkpoint (no {STATE})")
    state = read_json(state_file, "checkpoint record")
    wrong = [k for k, tp in REQUIRED.items() if not isinstance(state, dict) or not isinstance(state.get(k), tp)]
    if wrong:
        raise UserError(f"checkpoint {path}: {STATE} is corrupt (no valid {', '.join(wrong)})")
    if path.name.startswith(PREFIX) and path.name[len(PREFIX):].isdigit() and state["step"] != int(
            path.name[len(PREFIX):]):
        raise UserError(f"checkpoint {path}: {STATE} is corrupt (it records step {state['step']})")
    if not any(name.startswith(("model", SHARDS)) for name in state["files"]):
        raise UserError(f"checkpoint {path}: {STATE} is corrupt (it lists no model weights)")
    if RANDOM_STATE.format(0) not in state["files"]:  # Accelerate would resume without it, only logging so
        raise UserError(f"checkpoint {path}: {STATE} lists no {RANDOM_STATE.format(0)} (the random state), so a "
                        "resume from it could not be exact")
    check_sha256(state["files"], folder_digest(path), f"checkpoint {path}: file {{name}}")
    return state

"""The model: built from config or found by name (build, registry), LoRA, the training loss and
the fused output layer (loss, fused_loss), held-out evaluation (evaluate) and the exported final
model (export)."""
import logging
import warnings

# Set here, before any module of lib.model imports peft: bitsandbytes' CPU backend (which peft
# imports wherever bitsandbytes is installed) tries to fetch an optional kernel from the hub and
# warns on every import when it cannot, which offline is always; its own torch code then runs, as
# intended here.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
# peft calls a transformers method that transformers 5 renamed; nothing for a user to act on
warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)

"""The model: built from config or found by name (build, registry), LoRA, the training loss and
the fused output layer (loss, fused_loss), held-out evaluation (evaluate) and the exported final
model (export)."""

"""One SGD step of the train stage's Trainer, and the validation loss before it, run by torchrun in a prepared
work directory (test_train.py, test_distributed.py).

    torchrun --standalone --nproc_per_node N tests/ddp_step.py OUT.safetensors PER_DEVICE_BATCH [ddp|fsdp]

Any torchrun rendezvous works (two `--nnodes 2` launchers form one job). The weights after the step are
gathered whole (FSDP shards them) and written by the first process only.
"""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import datasets  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from stages.lib.modeling import load_causal_lm  # noqa: E402
from stages.lib.params import load_params  # noqa: E402
from stages.lib.paths import BASE_MODEL, TOKENIZED  # noqa: E402
from stages.train import build_trainer, end_worker, full_state_dict  # noqa: E402


def main(out: Path, batch: int, distributed: str = "ddp") -> None:
    params = load_params()
    params = params.model_copy(
        update={
            "train": params.train.model_copy(
                update={
                    "batch_size": batch,
                    "gradient_accumulation": 1,
                    "max_steps": 1,
                    "warmup_ratio": 0.0,
                    "lr_scheduler": "constant",
                    "learning_rate": 0.5,
                    "max_grad_norm": 1e9,
                    "precision": "fp32",
                    "distributed": distributed,
                }
            )
        }
    )
    model, tokenizer = load_causal_lm(BASE_MODEL)
    data = datasets.load_from_disk(str(TOKENIZED))
    trainer, _ = build_trainer(
        params,
        model.train(),
        tokenizer,
        data,
        out.parent / f"run-{out.stem}",
        optim="sgd",
        report_to="none",
        save_strategy="no",
        eval_strategy="no",
    )
    evaluation = trainer.evaluate()
    trainer.train()
    weights = full_state_dict(trainer)  # collective: every process takes part
    if trainer.is_world_process_zero():
        save_file({name: tensor.detach().clone().contiguous() for name, tensor in weights.items()}, str(out))
        out.with_suffix(".json").write_text(json.dumps({**evaluation, "world_size": trainer.args.world_size}))
    end_worker(0)  # as the train stage's workers end


if __name__ == "__main__":
    main(Path(sys.argv[1]), int(sys.argv[2]), *sys.argv[3:])

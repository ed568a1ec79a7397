"""Evaluate a run (or every run of a sweep) in --workdir; optionally sample text.

    python eval.py --workdir=runs/swiglu
    python eval.py --workdir=runs/swiglu --sample="ROMEO:" --temperature=0.8
    python eval.py --workdir=runs/compare          # a sweep: results.md, results.csv, plots
"""

from absl import app, flags

from ffn_jax.cli import run_eval

flags.DEFINE_string("workdir", None, "A run directory or a sweep directory.", required=True)
flags.DEFINE_integer("step", None, "Checkpoint step to evaluate (default: the latest).")
flags.DEFINE_string("sample", None, "Prompt to continue instead of evaluating.")
flags.DEFINE_float("temperature", 0.0, "Sampling temperature (0 = greedy).")
flags.DEFINE_integer("max_new_tokens", 200, "Tokens to generate with --sample.")
flags.DEFINE_integer("seed", 0, "Sampling seed.")


def main(argv):
    del argv
    f = flags.FLAGS
    run_eval(f.workdir, step=f.step, sample_prompt=f.sample, temperature=f.temperature,
             max_new_tokens=f.max_new_tokens, seed=f.seed)


if __name__ == "__main__":
    app.run(main)

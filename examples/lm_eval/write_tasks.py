"""Write the built-in evaluation tasks as JSONL files that lm-evaluation-harness reads with the YAMLs here.

    python examples/lm_eval/write_tasks.py                  # examples/lm_eval/data/<task>.jsonl, 500 items each
    python examples/lm_eval/write_tasks.py --limit 200 --chat

Each row is {"context", "choices", "gold", "target_delimiter", "id"}, the generic task-file format that
`tinygrad-llm eval RUN --task FILE` reads too, so both tools score exactly the same items. --chat writes
the chat forms of shakespeare_speaker and shakespeare_continue (for a post-trained run).
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir, os.pardir))

from tinygrad_llm.evals.builtin import TASK_NAMES, builtin_task  # noqa: E402
from tinygrad_llm.evals.tasks import write_task_file  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "data"))
    parser.add_argument("--limit", type=int, default=None, help="items per task (default: the built-in 500)")
    parser.add_argument("--chat", action="store_true", help="the chat forms, for a post-trained run")
    args = parser.parse_args()
    for name in TASK_NAMES:
        task = builtin_task(name, chat=args.chat, limit=args.limit)
        path = os.path.join(args.out, task.name + ".jsonl")    # the file names the YAMLs here expect
        write_task_file(task, path)
        print(f"{path}: {len(task.items)} items of {task.name}, target_delimiter {task.items[0].target_delimiter!r}")


if __name__ == "__main__":
    main()

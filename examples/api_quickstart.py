"""Fine-tune the embedded SmolLM2-135M-Instruct with MiLoRA from Python, then ask it a question.

    python examples/api_quickstart.py [--data ../shared/data/gsm8k/train.jsonl]
"""

import argparse

import torch

import qsvd


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", help="json/jsonl training data (default: qsvd's built-in arithmetic set)")
    parser.add_argument("--max-steps", type=int, default=20)
    args = parser.parse_args()

    result = qsvd.finetune(model="smollm2-135m", method="milora", bits=4, rank=16, data=args.data,
                           max_steps=args.max_steps, output="runs/api-quickstart", overwrite=True)
    model, tokenizer = qsvd.load_run(result.output)  # rebuilt from the run directory, no SVD
    question = "Ava has 12 apples, gets 7 more, then gives away 5. How many apples does Ava have now?"
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": question}],
                                           add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        answer = model.generate(**prompt.to(model.device), max_new_tokens=60, do_sample=False)
    print(tokenizer.decode(answer[0, prompt["input_ids"].shape[1]:], skip_special_tokens=True))


if __name__ == "__main__":
    main()

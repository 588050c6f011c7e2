"""Inputs of the shared reward table (tests/test_trl_rewards.py; expected values from TRL 1.16 itself, written by
benchmarks/derive_trl_reward_table.py into tests/data/trl_rewards_table.json)."""

# (completion text, solution)
ACCURACY_CASES = [
    (r"The answer is \boxed{\frac{1}{3}}", r"\frac{1}{3}"),
    (r"The answer is \boxed{\frac{1}{2}}", r"\frac{1}{3}"),
    (r"$\frac{2}{6}$", r"\frac{1}{3}"),
    (r"So x = $0.5$", r"\frac{1}{2}"),
    (r"\boxed{3}", "3"),
    ("3", "3"),
    (r"The result is $3$.", "$3$"),
    (r"The result is $4$.", "$3$"),
    (r"\boxed{2} but maybe \boxed{3}", "3"),
    (r"First $3$ then \boxed{5}", "5"),
    (r"<think>easy</think><answer>\boxed{7}</answer>", "<answer>7</answer>"),
    (r"<answer>7</answer>", "<answer>7</answer>"),
    ("<answer> 7 </answer>", "<answer> 7 </answer>"),
    (r"<think>so</think> \boxed{12}", "<answer> 12 </answer>"),
    ("red", "red"),
    ("The colour is red", "red"),
    ("(B)", "(B)"),
    (r"\boxed{B}", "B"),
    ("", "$5$"),
    (r"\boxed{10\%}", r"10\%"),
    (r"\boxed{x^2+2x+1}", r"(x+1)^2"),
    (r"$\sqrt{4}$", "2"),
    (r"\boxed{3 \text{ cm}}", "3"),
    (r"\boxed{\{1,2\}}", r"\{1, 2\}"),
    (r"Answer: $1,000$", "1000"),
]

# (completion text, solution) for reasoning_accuracy_reward with the default delimiter
REASONING_CASES = [
    (r"<think>r</think> The final answer is \boxed{\frac{1}{3}}", r"\frac{1}{3}"),
    (r"<think>r</think> The final answer is \boxed{\frac{1}{2}}", r"\frac{1}{3}"),
    (r"<think>partial \boxed{\frac{1}{3}} but no end", r"\frac{1}{3}"),
    (r"<think>a</think> b </think> \boxed{4}", "4"),
    (r"<think>a</think> \boxed{4}", "no math here"),
    (r"\boxed{4}</think>", "4"),
]

THINK_FORMAT_CASES = [
    "<think>\nThis is my reasoning.\n</think>\nThis is my answer.",
    "<think>r</think><answer>5</answer>",
    "<think>r</think>",
    "<think></think>",
    " <think>r</think> answer",
    "answer <think>r</think>",
    "<think>a<think>b</think> c",
    "<think>a</think> <think>b</think>",
    "<think>unclosed",
    "<answer>5</answer>",
    "<think>line1\nline2</think>\n\nfinal",
    "",
    "<THINK>r</THINK> x",
    "x\n<think>r</think> y",
]

# completion lengths for get_soft_overlong_punishment(max_completion_len=10, soft_punish_cache=4)
OVERLONG_LENGTHS = [0, 5, 6, 7, 8, 10, 11, 20]

# token id lists for get_repetition_penalty_reward(ngram_size=3, max_penalty=-1.0)
REPETITION_IDS = [[1, 2, 3, 4, 5], [1, 2, 1, 2, 1, 2], [7, 7, 7, 7], [1, 2], [1, 2, 3, 1, 2, 3, 1, 2, 3]]

# (completion, solution, length) for get_cosine_scaled_reward(max_len=100)
COSINE_CASES = [
    (r"\boxed{\frac{1}{3}}", r"\frac{1}{3}", 50),
    (r"\boxed{\frac{1}{2}}", r"\frac{1}{3}", 50),
    (r"\boxed{3}", "3", 0),
    (r"\boxed{4}", "3", 150),
    ("red", "red", 10),
]

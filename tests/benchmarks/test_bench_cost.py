"""`liber bench llm-cost`, tiny: real MovieLens-100K partitions, the real model and tokenizer."""
from benchmarks import bench_cost
from tests.conftest import base_settings


def test_cost_bench_counts_both_modes_on_the_same_partitions_and_reports_its_bound():
    settings = base_settings(max_events=5, llm_max_new_tokens=12)
    result = bench_cost.run(settings, dataset="ml-100k", users=5, gen_sample_users=1,
                            gen_sample_depth=1, naive_sample=1, log=lambda m: None)

    _, parts, _, _ = bench_cost._partitions(settings, "ml-100k", 5, lambda m: None)
    sizes = [[len(p) for p in user_parts] for user_parts in parts.values()]
    calls = sum(map(len, sizes))
    assert result["partitions"] == result["cascade"]["calls"] == result["naive"]["calls"] == calls
    assert result["cascade"]["generated_calls"] == 1 and result["naive"]["generated_calls"] == 1

    # naive re-reads every earlier partition: its prompts outgrow the cascade's
    naive_events = sum(sum(s[:k + 1]) for s in sizes for k in range(len(s)))
    bound = naive_events / sum(map(sum, sizes))
    assert result["token_ratio_items_only_bound"] == round(bound, 2) > 2
    assert result["naive"]["tokens_in"] > result["cascade"]["tokens_in"]
    assert result["token_ratio"] == round(result["naive"]["tokens"] / result["cascade"]["tokens"], 2)
    assert result["token_ratio"] < result["token_ratio_items_only_bound"]

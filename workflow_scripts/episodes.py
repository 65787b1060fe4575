"""Rule episodes: sample and save the fixed test episodes every method of a dataset/shot is scored on."""
from mtl.logs import log_to_file

log_to_file(snakemake.log[0])

from mtl.data.episodes import write_test_episodes

protocol = snakemake.params.protocol
write_test_episodes(
    snakemake.input.test,
    snakemake.output.episodes,
    way=int(snakemake.wildcards.way),
    shot=int(snakemake.wildcards.shot),
    query=protocol["query"],
    count=protocol["test_episodes"],
    seed=protocol["episode_seed"],
)

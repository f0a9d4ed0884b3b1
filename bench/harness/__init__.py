"""The one harness every benchmark (and the integration tests' process helpers) runs on.

- :mod:`bench.harness.report`: the broker URL, unique names, progress lines, the JSON emit;
- :mod:`bench.harness.stats`: percentiles, medians, histogram deltas of /metrics scrapes;
- :mod:`bench.harness.procs`: a worker as a real process (``python -m bridge.cli run ...``,
  optionally from another checkout with ``tree=``), free ports;
- :mod:`bench.harness.cpu`: /proc CPU, RSS and run-queue accounting of processes;
- :mod:`bench.harness.broker`: ``rabbitmqctl`` probes of the local RabbitMQ, disk usage;
- :mod:`bench.harness.profiler`: ``py-spy`` of a process, summarised as top frames;
- :mod:`bench.harness.proxy`: a TCP proxy for fault injection between a worker and the broker.
"""

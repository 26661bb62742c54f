"""State and recovery helpers of the kafka-python workers: the checkpoint protocol
(checkpoint.py), the worker base (worker.py), the RocksDB store base (rocks.py) and the ranker's
interest cache. The stream worker's tables use Faust's rocksdb:// store."""

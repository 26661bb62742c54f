"""RocksDB state helpers (rocksdict). The stream worker's tables use Faust's rocksdb:// store."""

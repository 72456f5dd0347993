"""The seed design, rebuilt small and faithful, as the baseline the benchmarks compare against."""

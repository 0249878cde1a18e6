"""Throughput, latency and scale measurements of the relay; they print numbers and assert nothing about speed."""

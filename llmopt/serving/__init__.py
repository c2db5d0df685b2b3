"""Serving under load: request traces, an OpenAI-compatible streaming client, server launchers, latency metrics.

``llmopt serve-bench`` drives a real OpenAI-compatible server (one llmopt starts, or one at ``--url``) with a
trace of timed requests and reports latency percentiles, throughput and goodput per request rate. Nothing here
imports torch: the servers run in processes of their own.
"""

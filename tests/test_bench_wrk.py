"""The bench reads wrk's summary (the API GET scenario's load) into its figures."""

from bench.api import parse_wrk

ALL_ANSWERED = """\
Running 10s test @ http://127.0.0.1:8911
  1 threads and 4 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency     4.21ms    3.02ms  41.93ms   88.20%
    Req/Sec     0.98k   101.44     1.21k    71.00%
  Latency Distribution
     50%    3.56ms
     75%    5.01ms
     90%    7.14ms
     99%   15.87ms
  9731 requests in 10.01s, 4.63MB read
Requests/sec:    972.15
Transfer/sec:    473.52KB
"""

REFUSED_AND_DROPPED = """\
Running 1s test @ http://127.0.0.1:8912/nothing-here
  1 threads and 2 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency     1.49ms    1.45ms  12.80ms   86.14%
    Req/Sec     1.49k   358.69     2.14k    70.00%
  Latency Distribution
     50%  880.00us
     75%    1.97ms
     90%    3.55ms
     99%     1.20s
  1485 requests in 1.00s, 754.10KB read
  Socket errors: connect 0, read 2, write 1, timeout 3
  Non-2xx or 3xx responses: 1485
Requests/sec:   1482.12
Transfer/sec:    752.64KB
"""


def test_a_run_with_every_answer_a_success_has_no_errors():
    report = parse_wrk(ALL_ANSWERED)
    assert (report.requests, report.errors, report.error_samples) == (9731, 0, [])
    assert (round(report.p50_seconds, 6), round(report.p99_seconds, 6)) == (0.00356, 0.01587)


def test_refused_answers_and_socket_errors_count_as_errors():
    report = parse_wrk(REFUSED_AND_DROPPED)
    assert (report.requests, report.errors) == (1485, 1485 + 6)
    assert (round(report.p50_seconds, 6), report.p99_seconds) == (0.00088, 1.2)
    assert report.error_samples == [REFUSED_AND_DROPPED[-500:]]

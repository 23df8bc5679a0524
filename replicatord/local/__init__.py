"""The local world for the demo, tests and benchmarks: emulated regions (moto servers with the
AWS-behaviour layer), the WAN link, the load generator, the demo. Not needed in production."""

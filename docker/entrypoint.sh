#!/bin/sh
# Shape this container's egress with tc tbf (needs NET_ADMIN), then run the splitnet command.
# LINK_RATE_MBIT: egress rate (unset or 0: unshaped). Delay/jitter/loss need netem, which this
# image does not assume; the netns harness (splitnet.lab) emulates them with a relay instead.
set -e
if [ -n "${LINK_RATE_MBIT}" ] && [ "${LINK_RATE_MBIT}" != "0" ]; then
    tc qdisc replace dev eth0 root tbf rate "${LINK_RATE_MBIT}mbit" burst 32kb latency 200ms
fi
if [ -n "${LINK_DELAY_MS}" ] && [ "${LINK_DELAY_MS}" != "0" ]; then
    tc qdisc replace dev eth0 root netem delay "${LINK_DELAY_MS}ms" rate "${LINK_RATE_MBIT:-1000}mbit" 2>/dev/null \
        || echo "splitnet-node: no netem in this kernel; LINK_DELAY_MS ignored" >&2
fi
exec splitnet "$@"

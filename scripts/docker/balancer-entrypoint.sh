#!/bin/sh
# nginx in the foreground on /etc/nginx/nginx.conf. Debian bookworm's nginx (1.22) predates
# `server NAME resolve` in an upstream (open-source nginx 1.27.3): there the parameter is
# dropped, so the replicas' addresses are looked up once, at start (a replica that comes back
# with another address is not seen until the balancer restarts; a dead one is skipped as failed).
set -eu
conf=/etc/nginx/nginx.conf
if ! nginx -t -q -c "$conf" 2> /tmp/nginx-test.log && grep -q 'invalid parameter "resolve"' /tmp/nginx-test.log; then
    sed 's/ resolve;/;/' "$conf" > /tmp/nginx.conf
    conf=/tmp/nginx.conf
    echo "balancer: nginx $(nginx -v 2>&1 | sed 's/.*nginx\///') has no upstream 'resolve': replicas resolved at start" >&2
fi
exec nginx -c "$conf" -g 'daemon off;'

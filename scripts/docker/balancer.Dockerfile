# The balancer of docker-compose.yml built from Debian packages, for machines that cannot pull
# nginx:1.27-alpine (scripts/docker/build-local.sh builds it; BALANCER_IMAGE picks it):
#
#   docker build -f scripts/docker/balancer.Dockerfile --build-arg BASE_IMAGE=<local base> \
#       -t reward-balancer:local scripts/docker
#
# It runs deploy/nginx.conf, mounted by docker-compose.yml as with the public image; that file
# names no `user`, so workers run as nobody, who owns nginx's temporary files here.
ARG BASE_IMAGE=debian:bookworm-slim
FROM ${BASE_IMAGE}
# An https mirror behind a TLS-intercepting proxy: give its CA bundle as the `ca` secret.
# hadolint ignore=DL3008
RUN --mount=type=secret,id=ca,required=false \
    if [ -s /run/secrets/ca ]; then echo 'Acquire::https::CAInfo "/run/secrets/ca";' > /etc/apt/apt.conf.d/99build-ca; fi \
    && apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends nginx-light \
    && rm -rf /var/lib/apt/lists/* /etc/apt/apt.conf.d/99build-ca \
    && mkdir -p /var/lib/nginx && chown -R nobody:nogroup /var/lib/nginx \
    && ln -sf /dev/stdout /var/log/nginx/access.log \
    && ln -sf /dev/stderr /var/log/nginx/error.log
COPY balancer-entrypoint.sh /usr/local/bin/balancer-entrypoint.sh
EXPOSE 8000
STOPSIGNAL SIGQUIT
ENTRYPOINT ["sh", "/usr/local/bin/balancer-entrypoint.sh"]

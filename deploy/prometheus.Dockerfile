# Prometheus for the compose stack where prom/prometheus cannot be pulled (no registry): Debian's
# prometheus and promtool on the local Debian base, plus busybox for the `wget` healthcheck that the
# upstream image (busybox-based) also answers. deploy/build_local_image.py builds it; the upstream
# image's entrypoint, user and data folder are kept, so docker-compose.yml runs either unchanged.
ARG BASE=localhost/fractal-base:bookworm
FROM ${BASE}
COPY prometheus promtool busybox /bin/
RUN ln -s /bin/busybox /usr/local/bin/wget \
    && mkdir -p /prometheus /etc/prometheus && chown nobody:nogroup /prometheus
USER nobody
WORKDIR /prometheus
VOLUME ["/prometheus"]
EXPOSE 9090
ENTRYPOINT ["/bin/prometheus"]
CMD ["--config.file=/etc/prometheus/prometheus.yml", "--storage.tsdb.path=/prometheus"]

# syntax=docker/dockerfile:1
# The mirror as a container: a small runtime image, non-root, the cache on a volume, the default
# configuration baked in at /etc/mirror/config.yaml (mount your own there, or point MIRROR_CONFIG
# elsewhere; MIRROR_* variables and flags after `serve` override single settings).
#
#   docker build -t mirror .
#   docker run --stop-timeout 40 -p 5000:5000 -p 9090:9090 -v mirror-cache:/var/cache/mirror mirror
#
# --stop-timeout: docker stop waits 10 s by default, less than the 30 s shutdown_grace pulls under
# way are given. The health check asks port 9090: a config of your own keeps metrics_listen there.

FROM python:3.11-slim-bookworm AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1
WORKDIR /src
COPY pyproject.toml README.md ./
COPY mirror ./mirror
RUN python -m venv /opt/mirror && /opt/mirror/bin/pip install . && /opt/mirror/bin/pip uninstall -y pip

FROM python:3.11-slim-bookworm
RUN groupadd --system --gid 10001 mirror \
 && useradd --system --uid 10001 --gid mirror --no-create-home --shell /usr/sbin/nologin mirror \
 && install -d -o mirror -g mirror -m 0750 /var/cache/mirror
COPY --from=build /opt/mirror /opt/mirror
COPY <<EOF /etc/mirror/config.yaml
# The image's default configuration: Docker Hub as docker.io, the cache on the volume, metrics
# and health on their own port. Every key is explained in config.example.yaml.
listen: "0.0.0.0:5000"
metrics_listen: "0.0.0.0:9090"
cache_dir: /var/cache/mirror
log_format: json
shutdown_grace: 30s
upstreams:
  - name: docker.io
    url: https://registry-1.docker.io
EOF
ENV PATH=/opt/mirror/bin:$PATH \
    MIRROR_CONFIG=/etc/mirror/config.yaml \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1
USER 10001:10001
VOLUME /var/cache/mirror
EXPOSE 5000 9090
STOPSIGNAL SIGTERM
HEALTHCHECK --interval=30s --timeout=5s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:9090/healthz', timeout=4)"]
ENTRYPOINT ["mirror"]
CMD ["serve"]

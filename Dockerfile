# Production image of kessai. One image, several processes: the compose file (or the
# orchestrator) picks the process with the command, e.g. `kessai migrate`, `kessai relay`.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# Unprivileged runtime user; its home holds KESSAI_HOME (embedded files, logs).
RUN groupadd --system --gid 10001 kessai \
    && useradd --system --uid 10001 --gid kessai --create-home --home-dir /home/kessai kessai

WORKDIR /src
COPY pyproject.toml README.md ./
COPY kessai ./kessai
COPY kessai_cli ./kessai_cli
COPY command_service ./command_service
COPY query_service ./query_service
COPY projector ./projector
COPY reconciler ./reconciler
COPY migrations ./migrations
RUN pip install . && rm -rf /src/build /src/*.egg-info

WORKDIR /home/kessai
USER 10001:10001

ENV KESSAI_HOME=/home/kessai/.kessai \
    KESSAI_COMMAND_API_HOST=0.0.0.0 \
    KESSAI_COMMAND_API_PORT=8000

EXPOSE 8000 8001
CMD ["kessai", "command-api"]

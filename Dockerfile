# The LLM worker of Life Organiser.
#
#   docker build -t llm-worker .              # the runtime image (last stage)
#   docker build --target test .              # runs the test suite as CI does (.ci/run)
#
# The build stage installs the locked dependencies and bundles the worker into one file
# (`deno task bundle`, with the dead-letter and prompts tools beside it); the runtime image holds
# only those files and runs the worker as the image's non-root `deno` user, with the permissions
# of `deno task start`.

FROM denoland/deno:2.9.6 AS build
WORKDIR /app
# Dependencies first, from the lockfile only: this layer is rebuilt only when they change.
COPY deno.json deno.lock ./
RUN deno install --frozen
COPY . .
RUN deno task bundle

# `docker build --target test .`: the same commands as CI (.ci/run installs redis-server, then
# runs `deno install --frozen` and `deno task test`).
FROM build AS test
RUN CI=true bash .ci/run

FROM denoland/deno:2.9.6 AS runtime
WORKDIR /app
COPY --from=build --chown=deno:deno /app/dist/llm-worker.bundle.js ./llm-worker.js
# The dead-letter tool (README "Dead letters"):
#   docker compose exec llm-worker deno run --no-config --allow-net --allow-env --allow-read=.env dead.js list
COPY --from=build --chown=deno:deno /app/dist/dead.bundle.js ./dead.js
# The built-in prompts, as a start for LLM_PROMPTS_DIR (README "Prompts"):
#   docker run --rm -v "$PWD/prompts:/prompts" <image> run --no-config --allow-write=/prompts prompts.js /prompts
COPY --from=build --chown=deno:deno /app/dist/prompts.bundle.js ./prompts.js
USER deno

ENV IMAGE_STORAGE_PATH=/data/images \
    WORKER_HTTP_PORT=9464
# V8's heap is sized for the worker, as in `deno task start` (`--v8-flags`, README "Memory"): 8 MB
# semi-spaces and V8's memory balancer. DENO_V8_FLAGS adds flags but cannot undo these (the
# command line's flags are applied after it); to change them, override the CMD.
# Shared with Core: the images to tag (IMAGE_STORAGE_PATH); the worker only reads it.
VOLUME /data/images
# Health and metrics (WORKER_HTTP_PORT): /healthz, /readyz, /metrics.
EXPOSE 9464

# Liveness: the image has no curl, Deno itself asks /healthz (200 while the process runs, even
# with Redis or the model server away). docker-compose.example.yml checks readiness (/readyz).
HEALTHCHECK --interval=30s --timeout=5s --start-period=20s --retries=3 \
  CMD ["deno", "eval", "const r = await fetch(`http://127.0.0.1:${Deno.env.get('WORKER_HTTP_PORT') || '9464'}/healthz`).catch(() => null); Deno.exit(r?.ok ? 0 : 1);"]

# SIGTERM drains jobs in flight for up to WORKER_SHUTDOWN_TIMEOUT_MS (default 30 s): give the
# container at least that long to stop (compose: stop_grace_period; Kubernetes:
# terminationGracePeriodSeconds).
CMD ["run", "--no-config", "--v8-flags=--max-semi-space-size=8,--memory-balancer", "--allow-net", "--allow-env", "--allow-read", "--allow-sys=hostname", "llm-worker.js"]

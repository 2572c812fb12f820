# The LLM worker. A later issue turns this into a multi-stage build.
FROM denoland/deno:2.9.6

WORKDIR /app
# The image's non-root user owns the app folder, so dependencies install and run as that user.
RUN chown deno:deno /app
USER deno

# Dependencies first, from the lockfile only: this layer is rebuilt only when they change.
COPY --chown=deno:deno deno.json deno.lock ./
RUN deno install --frozen

COPY --chown=deno:deno . .
RUN deno cache main.ts

# Shared with Core: the images to tag (IMAGE_STORAGE_PATH).
VOLUME /data/images
# Health and metrics (WORKER_HTTP_PORT).
EXPOSE 9464

CMD ["task", "start"]

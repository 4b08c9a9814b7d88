# syntax=docker/dockerfile:1
# rightsizer: multi-stage, slim, non-root. Build: docker build -t rightsizer .
# Run:   docker run -p 8080:8080 -e RIGHTSIZER_SERVER__HOST=0.0.0.0 rightsizer \
#          serve --backend http://vllm:8000
FROM python:3.11-slim AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY proxy ./proxy
COPY estimator ./estimator
COPY configs ./configs
RUN pip wheel --no-cache-dir --wheel-dir /wheels .

FROM python:3.11-slim
RUN useradd --create-home --uid 10001 rightsizer
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir /wheels/*.whl && rm -rf /wheels
COPY --chown=rightsizer configs /etc/rightsizer
USER rightsizer
ENV RIGHTSIZER_SERVER__HOST=0.0.0.0 \
    RIGHTSIZER_SERVER__PORT=8080 \
    PYTHONUNBUFFERED=1
EXPOSE 8080
HEALTHCHECK --interval=10s --timeout=3s --start-period=5s --retries=3 \
  CMD python -c "import os,urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/health' % os.environ.get('RIGHTSIZER_SERVER__PORT','8080'), timeout=2)"
ENTRYPOINT ["rightsizer"]
CMD ["serve", "--config", "/etc/rightsizer/proxy.yaml"]

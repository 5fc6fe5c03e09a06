{{/*
Chart name, truncated to 63 characters (DNS label limit).
*/}}
{{- define "cbmir.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Fully qualified app name. Component names are appended to it, so keep room for "-worker-gpu".
*/}}
{{- define "cbmir.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 52 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 52 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 52 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "cbmir.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Common labels.
*/}}
{{- define "cbmir.labels" -}}
helm.sh/chart: {{ include "cbmir.chart" . }}
{{ include "cbmir.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: cbmir
{{- end }}

{{/*
Selector labels (without the component).
*/}}
{{- define "cbmir.selectorLabels" -}}
app.kubernetes.io/name: {{ include "cbmir.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/*
Labels of one component. Call with (dict "root" $ "component" "scp").
*/}}
{{- define "cbmir.componentLabels" -}}
{{ include "cbmir.labels" .root }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{- define "cbmir.componentSelectorLabels" -}}
{{ include "cbmir.selectorLabels" .root }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{- define "cbmir.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "cbmir.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "cbmir.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}

{{- define "cbmir.gpuImage" -}}
{{- $repository := default .Values.image.repository .Values.workerGpu.image.repository }}
{{- $tag := default (printf "%s-gpu" .Chart.AppVersion) .Values.workerGpu.image.tag }}
{{- printf "%s:%s" $repository $tag }}
{{- end }}

{{- define "cbmir.claimName" -}}
{{- default (printf "%s-data" (include "cbmir.fullname" .)) .Values.persistence.existingClaim }}
{{- end }}

{{- define "cbmir.secretName" -}}
{{- printf "%s-secret" (include "cbmir.fullname" .) }}
{{- end }}

{{/*
Fail early on what cbmir cannot run without in a cluster.
*/}}
{{- define "cbmir.validate" -}}
{{- if and (not .Values.broker.url) (not .Values.broker.existingSecret) }}
{{- fail "broker.url (a Redis URL for the Celery broker) or broker.existingSecret is required" }}
{{- end }}
{{- if not .Values.qdrant.url }}
{{- fail "qdrant.url (a Qdrant server) is required: the embedded index admits one process only" }}
{{- end }}
{{- if and .Values.worker.autoscaling.enabled .Values.worker.keda.enabled }}
{{- fail "worker.autoscaling and worker.keda both scale the workers: enable one of them" }}
{{- end }}
{{- if and .Values.worker.keda.enabled (not .Values.worker.keda.redisAddress) }}
{{- fail "worker.keda.redisAddress (host:port of the broker's Redis, as KEDA reaches it) is required with worker.keda.enabled" }}
{{- end }}
{{- if and .Values.gateway.ingress.enabled (not .Values.gateway.enabled) }}
{{- fail "gateway.ingress.enabled routes to the HTTP gateway: it needs gateway.enabled" }}
{{- end }}
{{- if and .Values.gateway.enabled (eq (int .Values.gateway.port) 50051) }}
{{- fail "gateway.port must differ from the query container's gRPC port 50051 (they share the pod)" }}
{{- end }}
{{- if and .Values.gateway.enabled .Values.metrics.enabled (eq (int .Values.gateway.port) (int .Values.metrics.port)) }}
{{- fail "gateway.port must differ from metrics.port (they share the query pod)" }}
{{- end }}
{{- if not (or .Values.auth.tokens .Values.auth.existingSecret .Values.auth.allowAnonymous) }}
{{- fail "auth.tokens or auth.existingSecret (API tokens for the query service) is required; auth.allowAnonymous=true serves callers without a token" }}
{{- end }}
{{- end }}

{{/*
TLS: the certificate Secret mounted at /etc/cbmir/tls, and the settings that point at it.
*/}}
{{- define "cbmir.tlsEnv" -}}
{{- if .Values.tls.secretName }}
- name: CBMIR_TLS_CERT
  value: /etc/cbmir/tls/tls.crt
- name: CBMIR_TLS_KEY
  value: /etc/cbmir/tls/tls.key
{{- if .Values.tls.requireClientCertificates }}
- name: CBMIR_TLS_CLIENT_CA
  value: /etc/cbmir/tls/ca.crt
{{- end }}
{{- end }}
{{- end }}

{{- define "cbmir.tlsVolume" -}}
{{- if .Values.tls.secretName }}
- name: tls
  secret:
    secretName: {{ .Values.tls.secretName }}
{{- end }}
{{- end }}

{{- define "cbmir.tlsVolumeMount" -}}
{{- if .Values.tls.secretName }}
- name: tls
  mountPath: /etc/cbmir/tls
  readOnly: true
{{- end }}
{{- end }}

{{/*
Environment common to every component: ConfigMap, broker URL and Qdrant API key from Secrets, extras.
*/}}
{{- define "cbmir.envFrom" -}}
- configMapRef:
    name: {{ include "cbmir.fullname" . }}
{{- end }}

{{- define "cbmir.env" -}}
- name: CBMIR_BROKER_URL
  valueFrom:
    secretKeyRef:
      {{- if .Values.broker.existingSecret }}
      name: {{ .Values.broker.existingSecret }}
      key: {{ .Values.broker.existingSecretKey }}
      {{- else }}
      name: {{ include "cbmir.secretName" . }}
      key: broker-url
      {{- end }}
{{- if or .Values.qdrant.apiKey .Values.qdrant.existingSecret }}
- name: QDRANT_API_KEY
  valueFrom:
    secretKeyRef:
      {{- if .Values.qdrant.existingSecret }}
      name: {{ .Values.qdrant.existingSecret }}
      key: {{ .Values.qdrant.existingSecretKey }}
      {{- else }}
      name: {{ include "cbmir.secretName" . }}
      key: qdrant-api-key
      {{- end }}
{{- end }}
{{- if or .Values.patientKey.secret .Values.patientKey.existingSecret }}
- name: CBMIR_PATIENT_KEY_SECRET
  valueFrom:
    secretKeyRef:
      {{- if .Values.patientKey.existingSecret }}
      name: {{ .Values.patientKey.existingSecret }}
      key: {{ .Values.patientKey.existingSecretKey }}
      {{- else }}
      name: {{ include "cbmir.secretName" . }}
      key: patient-key-secret
      {{- end }}
{{- end }}
{{- with .Values.extraEnv }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/*
Pod-level pieces shared by every Deployment.
*/}}
{{- define "cbmir.podAnnotations" -}}
checksum/config: {{ include (print .Template.BasePath "/configmap.yaml") . | sha256sum }}
checksum/secret: {{ include (print .Template.BasePath "/secret.yaml") . | sha256sum }}
{{- with .Values.podAnnotations }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{- define "cbmir.volumes" -}}
- name: data
  {{- if .Values.persistence.enabled }}
  persistentVolumeClaim:
    claimName: {{ include "cbmir.claimName" . }}
  {{- else }}
  emptyDir: {}
  {{- end }}
- name: tmp
  emptyDir: {}
{{- end }}

{{- define "cbmir.volumeMounts" -}}
- name: data
  mountPath: {{ .Values.persistence.mountPath }}
- name: tmp
  mountPath: /tmp
{{- end }}

{{/*
Prometheus metrics: the pods of every Deployment serve /metrics on metrics.port (CBMIR_METRICS_PORT),
on the pod's address; the NetworkPolicy lets networkPolicy.metricsFrom (empty: anyone) reach it.
*/}}
{{- define "cbmir.metricsEnv" -}}
{{- if .Values.metrics.enabled -}}
- name: CBMIR_METRICS_PORT
  value: {{ .Values.metrics.port | int | toString | quote }}
- name: CBMIR_METRICS_HOST
  value: "0.0.0.0"
{{- end }}
{{- end }}

{{- define "cbmir.metricsPort" -}}
{{- if .Values.metrics.enabled -}}
- name: metrics
  containerPort: {{ .Values.metrics.port | int }}
  protocol: TCP
{{- end }}
{{- end }}

{{- define "cbmir.metricsAnnotations" -}}
{{- if and .Values.metrics.enabled .Values.metrics.scrapeAnnotations -}}
prometheus.io/scrape: "true"
prometheus.io/port: {{ .Values.metrics.port | int | toString | quote }}
prometheus.io/path: /metrics
{{- end }}
{{- end }}

{{- define "cbmir.metricsIngress" -}}
{{- if .Values.metrics.enabled -}}
- ports:
    - port: metrics
      protocol: TCP
  {{- with .Values.networkPolicy.metricsFrom }}
  from:
    {{- toYaml . | nindent 4 }}
  {{- end }}
{{- end }}
{{- end }}

{{/*
Celery remote-control ping of this pod's worker node (the node name is celery@<pod hostname>).
*/}}
{{- define "cbmir.workerPing" -}}
- python
- -c
- >-
  import socket, sys;
  from services.core.config import WorkerSettings;
  from workers.app import create_app;
  app = create_app(WorkerSettings.from_env());
  sys.exit(0 if app.control.ping(destination=['celery@' + socket.gethostname()], timeout=5) else 1)
{{- end }}

{{/*
The HTTP gateway's way to the query container beside it in the pod: gRPC on the pod's loopback. With
tls.secretName the query container serves TLS with a certificate made out to a name, not to 127.0.0.1:
the gateway checks it against that name (CBMIR_QUERY_SERVER_NAME: gateway.queryServerName, by default
the query Service's <fullname>-query.<namespace>.svc), trusting the Secret's ca.crt and, with client
certificates required, showing the Secret's certificate.
*/}}
{{- define "cbmir.gatewayQueryName" -}}
{{- default (printf "%s-query.%s.svc" (include "cbmir.fullname" .) .Release.Namespace) .Values.gateway.queryServerName }}
{{- end }}

{{- define "cbmir.gatewayQueryEnv" -}}
- name: CBMIR_QUERY_TARGET
  value: "127.0.0.1:50051"
{{- if .Values.tls.secretName }}
- name: CBMIR_QUERY_SERVER_NAME
  value: {{ include "cbmir.gatewayQueryName" . | quote }}
- name: CBMIR_TLS_CA
  value: /etc/cbmir/tls/ca.crt
{{- if .Values.tls.requireClientCertificates }}
- name: CBMIR_TLS_CERT
  value: /etc/cbmir/tls/tls.crt
- name: CBMIR_TLS_KEY
  value: /etc/cbmir/tls/tls.key
{{- end }}
{{- end }}
{{- end }}

{{/* Names */}}
{{- define "gpuhost.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 50 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 50 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "gpuhost.labels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{/* Selector labels of one component: include with (dict "root" $ "component" "gateway") */}}
{{- define "gpuhost.selector" -}}
app.kubernetes.io/name: {{ .root.Chart.Name }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{- define "gpuhost.secretName" -}}
{{- default (printf "%s-secrets" (include "gpuhost.fullname" .)) .Values.secrets.existingSecret -}}
{{- end -}}

{{- define "gpuhost.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "gpuhost.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "gpuhost.tag" -}}
{{- default .Chart.AppVersion .Values.image.tag -}}
{{- end -}}

{{/* Settings every process reads: the services' URLs from the Secret, plans from the ConfigMap. */}}
{{- define "gpuhost.commonEnv" -}}
- name: GPUHOST_DATABASE_URL
  valueFrom:
    secretKeyRef: {name: {{ include "gpuhost.secretName" . }}, key: database-url}
- name: GPUHOST_REDIS_URL
  valueFrom:
    secretKeyRef: {name: {{ include "gpuhost.secretName" . }}, key: redis-url}
- name: GPUHOST_STORAGE_URL
  value: {{ .Values.storage.url | default .Values.storage.mountPath | quote }}
- name: GPUHOST_LOG_FORMAT
  value: {{ .Values.logFormat | quote }}
{{- with .Values.otlpEndpoint }}
- name: GPUHOST_OTEL_EXPORTER_OTLP_ENDPOINT
  value: {{ . | quote }}
{{- end }}
{{- if .Values.plans }}
- name: GPUHOST_PLANS
  valueFrom:
    configMapKeyRef: {name: {{ include "gpuhost.fullname" . }}-config, key: plans.json}
{{- end }}
{{- end -}}

{{- define "gpuhost.extraEnv" -}}
{{- range $name, $value := . }}
- name: {{ $name }}
  value: {{ $value | toString | quote }}
{{- end }}
{{- end -}}

{{- define "gpuhost.podSecurityContext" -}}
runAsNonRoot: true
runAsUser: {{ .Values.runAsUser }}
runAsGroup: {{ .Values.runAsUser }}
fsGroup: {{ .Values.runAsUser }}
seccompProfile:
  type: RuntimeDefault
{{- end -}}

{{- define "gpuhost.containerSecurityContext" -}}
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
runAsNonRoot: true
capabilities:
  drop: ["ALL"]
{{- end -}}

{{- define "gpuhost.imagePullSecrets" -}}
{{- with .Values.image.pullSecrets }}
imagePullSecrets:
{{- range . }}
  - name: {{ . }}
{{- end }}
{{- end }}
{{- end -}}

{{- define "gpuhost.storageMount" -}}
{{- if not .Values.storage.url }}
- {name: storage, mountPath: {{ .Values.storage.mountPath | quote }}}
{{- end }}
{{- end -}}

{{- define "gpuhost.storageVolume" -}}
{{- if not .Values.storage.url }}
- name: storage
  {{- if .Values.storage.existingClaim }}
  persistentVolumeClaim:
    claimName: {{ .Values.storage.existingClaim }}
  {{- else }}
  emptyDir: {}
  {{- end }}
{{- end }}
{{- end -}}

{{/* The chart name, or nameOverride. */}}
{{- define "mirror.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
The full name of the release's resources. Truncated to 52 characters: the StatefulSet's
controller-revision-hash label (name plus a hash) must fit in 63.
*/}}
{{- define "mirror.fullname" -}}
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

{{/* The headless Service that gives the StatefulSet's pods their DNS names. */}}
{{- define "mirror.headlessName" -}}
{{- printf "%s-headless" (include "mirror.fullname" .) }}
{{- end }}

{{/* Chart name and version, for the helm.sh/chart label. */}}
{{- define "mirror.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Labels on every resource. */}}
{{- define "mirror.labels" -}}
helm.sh/chart: {{ include "mirror.chart" . }}
{{ include "mirror.selectorLabels" . }}
app.kubernetes.io/version: {{ .Values.image.tag | default .Chart.AppVersion | trunc 63 | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{/* Labels that select the pods; immutable in a StatefulSet, so never the version. */}}
{{- define "mirror.selectorLabels" -}}
app.kubernetes.io/name: {{ include "mirror.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "mirror.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "mirror.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* The chart's Secret for inline upstream passwords. */}}
{{- define "mirror.secretName" -}}
{{- printf "%s-credentials" (include "mirror.fullname" .) }}
{{- end }}

{{/*
A Secret key for an upstream name: registry hosts may hold characters keys may not (the colon
of 127.0.0.1:5001), which become "-".
*/}}
{{- define "mirror.secretKey" -}}
{{- printf "%s.password" (regexReplaceAll "[^-._a-zA-Z0-9]" . "-") }}
{{- end }}

{{/* Whether any upstream has credentials: "true" or empty. */}}
{{- define "mirror.hasCredentials" -}}
{{- range .Values.upstreams }}{{ if .credentials }}true{{ end }}{{ end }}
{{- end }}

{{/* Whether any upstream has an inline password, which the chart's Secret holds: "true" or empty. */}}
{{- define "mirror.hasInlinePasswords" -}}
{{- range .Values.upstreams }}{{ if and .credentials .credentials.password }}true{{ end }}{{ end }}
{{- end }}

{{/* Checks an upstream's credentials; fails with the value path to fix. */}}
{{- define "mirror.checkCredentials" -}}
{{- $where := printf "upstreams[%s].credentials" .name }}
{{- $unknown := without (keys .credentials) "username" "password" "existingSecret" "passwordKey" }}
{{- if has "usernameKey" $unknown }}
{{- fail (printf "%s.usernameKey: the mirror reads the username from its config file, not from a Secret: give username" $where) }}
{{- else if $unknown }}
{{- fail (printf "%s: unknown keys %s (expected username with password or existingSecret and passwordKey)" $where (join ", " (sortAlpha $unknown))) }}
{{- end }}
{{- if not .credentials.username }}
{{- fail (printf "%s: username is required" $where) }}
{{- end }}
{{- if eq (empty .credentials.password) (empty .credentials.existingSecret) }}
{{- fail (printf "%s: give either password or existingSecret" $where) }}
{{- end }}
{{- end }}

{{/* Whether client authentication is on (an htpasswd file or access rules): "true" or empty. */}}
{{- define "mirror.authEnabled" -}}
{{- if or .Values.auth.htpasswd.existingSecret .Values.auth.htpasswd.content .Values.auth.access }}true{{ end }}
{{- end }}

{{/* The chart's Secret for an inline htpasswd file and the token signing key it generates. */}}
{{- define "mirror.authSecretName" -}}
{{- printf "%s-auth" (include "mirror.fullname" .) }}
{{- end }}

{{/* Whether the chart's auth Secret has anything to hold: "true" or empty. */}}
{{- define "mirror.hasAuthSecret" -}}
{{- if and (include "mirror.authEnabled" .) (or .Values.auth.htpasswd.content (not .Values.auth.token.keySecret)) }}true{{ end }}
{{- end }}

{{/* The scheme of the registry API: https with tls.existingSecret, else http. */}}
{{- define "mirror.scheme" -}}
{{- ternary "https" "http" (not (empty .Values.tls.existingSecret)) }}
{{- end }}

{{/* Checks auth and tls; fails with the value path to fix. */}}
{{- define "mirror.checkAuthAndTls" -}}
{{- $auth := .Values.auth }}
{{- if and $auth.htpasswd.existingSecret $auth.htpasswd.content }}
{{- fail "auth.htpasswd: give either content or existingSecret, not both" }}
{{- end }}
{{- if and $auth.groups (not (include "mirror.authEnabled" .)) }}
{{- fail "auth.groups: only used with auth.htpasswd or auth.access" }}
{{- end }}
{{- if and $auth.token.realm (not (regexMatch "^https?://[^/]+" (toString $auth.token.realm))) }}
{{- fail (printf "auth.token.realm: expected the token service's http(s) URL, got %q" (toString $auth.token.realm)) }}
{{- end }}
{{- $tls := .Values.tls }}
{{- if and $tls.clientCA.existingSecret (not $tls.existingSecret) }}
{{- fail "tls.clientCA: client certificates need HTTPS: set tls.existingSecret too" }}
{{- end }}
{{- if not (has $tls.clientCerts (list "optional" "required")) }}
{{- fail (printf "tls.clientCerts: expected optional or required, got %v" $tls.clientCerts) }}
{{- end }}
{{- if and (eq $tls.clientCerts "required") (not $tls.clientCA.existingSecret) }}
{{- fail "tls.clientCerts: required needs tls.clientCA.existingSecret" }}
{{- end }}
{{- end }}

{{/* A Kubernetes quantity (50Gi, 500M, 1.5Ti, 1000000) in bytes. */}}
{{- define "mirror.quantityBytes" -}}
{{- $quantity := kindIs "float64" . | ternary (printf "%.0f" .) (toString .) }}
{{- if not (regexMatch "^[0-9]+(\\.[0-9]+)?([KMGTPE]i|[kMGTPE])?$" $quantity) }}
{{- fail (printf "cannot work out the cache size from the volume size %q: set config.max_size" $quantity) }}
{{- end }}
{{- $number := regexFind "^[0-9.]+" $quantity }}
{{- $units := dict "" 1 "k" 1000 "M" 1000000 "G" 1000000000 "T" 1000000000000 "P" 1000000000000000 "E" 1000000000000000000 "Ki" 1024 "Mi" 1048576 "Gi" 1073741824 "Ti" 1099511627776 "Pi" 1125899906842624 "Ei" 1152921504606846976 }}
{{- printf "%.0f" (mulf $number (get $units (trimPrefix $number $quantity))) }}
{{- end }}

{{/*
The mirror's max_size: config.max_size, else persistence.maxSizePercent of the cache volume, so
the cache never fills it; empty for an emptyDir without a size limit. In cluster mode the cache
is the bucket, which has no size to take a share of: config.max_size only.
*/}}
{{- define "mirror.maxSize" -}}
{{- $volume := ternary .Values.persistence.size .Values.persistence.emptyDir.sizeLimit .Values.persistence.enabled }}
{{- if .Values.cluster.enabled }}
{{- $volume = "" }}
{{- end }}
{{- if kindIs "float64" .Values.config.max_size }}
{{- printf "%.0f" .Values.config.max_size }}
{{- else if .Values.config.max_size }}
{{- .Values.config.max_size | toJson }}
{{- else if $volume }}
{{- $percent := .Values.persistence.maxSizePercent }}
{{- if or (le (float64 $percent) 0.0) (gt (float64 $percent) 100.0) }}
{{- fail (printf "persistence.maxSizePercent: expected a percentage above 0 and up to 100, got %v" $percent) }}
{{- end }}
{{- printf "%.0f" (floor (divf (mulf (include "mirror.quantityBytes" $volume) $percent) 100)) }}
{{- end }}
{{- end }}

{{/* A mirror duration (30s, 5m, 1.5h, or seconds as a number) in seconds. */}}
{{- define "mirror.durationSeconds" -}}
{{- $text := kindIs "float64" . | ternary (printf "%v" .) (toString .) | trim }}
{{- if not (regexMatch "^[0-9]+(\\.[0-9]+)?\\s*(ms|s|m|h|d)?$" $text) }}
{{- fail (printf "config.shutdown_grace: expected a duration such as 30s or 2m, got %q" $text) }}
{{- end }}
{{- $number := regexFind "^[0-9.]+" $text }}
{{- $units := dict "" 1 "ms" 0.001 "s" 1 "m" 60 "h" 3600 "d" 86400 }}
{{- mulf $number (get $units (trimPrefix $number $text | trim)) }}
{{- end }}

{{/*
Seconds Kubernetes gives a stopping pod: more than the preStop sleep and shutdown_grace together,
so responses under way can finish.
*/}}
{{- define "mirror.terminationGracePeriod" -}}
{{- $grace := include "mirror.durationSeconds" (.Values.config.shutdown_grace | default "30s") | float64 }}
{{- $needed := addf $grace (.Values.preStopSleepSeconds | default 0) }}
{{- if kindIs "invalid" .Values.terminationGracePeriodSeconds }}
{{- add (ceil $needed) 15 }}
{{- else if le (float64 .Values.terminationGracePeriodSeconds) $needed }}
{{- fail (printf "terminationGracePeriodSeconds (%v) must exceed preStopSleepSeconds plus config.shutdown_grace (%v s), or responses under way are killed" .Values.terminationGracePeriodSeconds $needed) }}
{{- else }}
{{- int64 .Values.terminationGracePeriodSeconds }}
{{- end }}
{{- end }}

{{/* The Service's DNS name and API port. */}}
{{- define "mirror.serviceAddress" -}}
{{- printf "%s.%s.svc.%s:%v" (include "mirror.fullname" .) .Release.Namespace .Values.clusterDomain (int64 .Values.service.port) }}
{{- end }}

{{/* The host:port nodes' containerd and Docker reach the mirror at (see nodeEndpoint). */}}
{{- define "mirror.nodeEndpoint" -}}
{{- if .Values.nodeEndpoint }}
{{- .Values.nodeEndpoint }}
{{- else if and .Values.service.clusterIP (ne .Values.service.clusterIP "None") }}
{{- printf "%s:%v" .Values.service.clusterIP (int64 .Values.service.port) }}
{{- else }}
{{- include "mirror.serviceAddress" . }}
{{- end }}
{{- end }}

{{/* The mirror's config.yaml. */}}
{{- define "mirror.config" -}}
{{- range list "listen" "metrics_listen" "cache_dir" }}
{{- if hasKey $.Values.config . }}
{{- fail (printf "config.%s: the chart sets this itself" .) }}
{{- end }}
{{- end }}
{{- range list "upstreams" "auth" "tls" }}
{{- if hasKey $.Values.config . }}
{{- fail (printf "config.%s: the chart renders this from the top-level %s value" . .) }}
{{- end }}
{{- end }}
{{- include "mirror.checkAuthAndTls" . }}
{{- include "mirror.checkCluster" . }}
{{- if not .Values.upstreams }}
{{- fail "upstreams: give at least one registry to mirror" }}
{{- end -}}
# Rendered by the mirror Helm chart from its values; see config.example.yaml for every key.
listen: "0.0.0.0:5000"
metrics_listen: "0.0.0.0:9090"
cache_dir: /var/cache/mirror
{{- if .Values.cluster.enabled }}
# Cluster mode: cache_dir is only the spool of downloads under way. The shared storage, Redis and
# the address other replicas reach this pod at come from the environment: MIRROR_STORAGE,
# MIRROR_REDIS and MIRROR_ADVERTISE (and the bucket's endpoint and keys from AWS_*).
{{- end }}
{{- with include "mirror.maxSize" . }}
max_size: {{ . }}
{{- if not $.Values.config.max_size }}  # {{ $.Values.persistence.maxSizePercent }}% of the cache volume, for headroom
{{- end }}
{{- end }}
{{- range $key, $value := omit .Values.config "max_size" }}
{{- if not (or (kindIs "invalid" $value) (eq (toString $value) "")) }}
{{ dict $key $value | toYaml }}
{{- end }}
{{- end }}
{{- if include "mirror.authEnabled" . }}
auth:
{{- if or .Values.auth.htpasswd.existingSecret .Values.auth.htpasswd.content }}
  htpasswd: /etc/mirror/auth/htpasswd
{{- end }}
  token:
    lifetime: {{ .Values.auth.token.lifetime | default "5m" | toJson }}
    key_file: /etc/mirror/auth/token.key
{{- with .Values.auth.token.realm }}
    realm: {{ . | toJson }}
{{- end }}
{{- with .Values.auth.groups }}
  groups:
    {{- toYaml . | nindent 4 }}
{{- end }}
{{- with .Values.auth.access }}
  access:
    {{- toYaml . | nindent 4 }}
{{- end }}
{{- end }}
{{- if .Values.tls.existingSecret }}
tls:
  cert: /etc/mirror/tls/tls.crt
  key: /etc/mirror/tls/tls.key
{{- if .Values.tls.clientCA.existingSecret }}
  client_ca: /etc/mirror/tls/ca.crt
  client_certs: {{ .Values.tls.clientCerts | toJson }}
{{- end }}
{{- end }}
upstreams:
{{- range .Values.upstreams }}
{{- if not (and .name .url) }}
{{- fail "upstreams: every upstream needs a name and a url" }}
{{- end }}
  - name: {{ .name | toJson }}
{{- with omit . "name" "credentials" }}
    {{- toYaml . | nindent 4 }}
{{- end }}
{{- if .credentials }}
{{- include "mirror.checkCredentials" . }}
    credentials:
      username: {{ .credentials.username | toJson }}
      password_file: {{ printf "/etc/mirror/secrets/%s/password" .name | toJson }}
{{- end }}
{{- end }}
{{- end }}

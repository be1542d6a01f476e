{{/*
Cluster mode (cluster.enabled): a Deployment whose pods share one cache in an S3 bucket and
coordinate through Redis, each spooling its downloads under way in an emptyDir.
*/}}

{{/* The chart's Secret for inline S3 keys and a Redis URL holding a password. */}}
{{- define "mirror.clusterSecretName" -}}
{{- printf "%s-cluster" (include "mirror.fullname" .) }}
{{- end }}

{{/*
Whether cluster.redis.url holds a password (user:password@ or ?password=), so that it goes into
the chart's Secret rather than into the pod spec: "true" or empty.
*/}}
{{- define "mirror.redisUrlIsSecret" -}}
{{- if regexMatch "^[^:/?#]+://[^/?#]*@|[?&]password=" (toString .Values.cluster.redis.url) }}true{{ end }}
{{- end }}

{{/* Whether the chart's cluster Secret has anything to hold: "true" or empty. */}}
{{- define "mirror.hasClusterSecret" -}}
{{- $cluster := .Values.cluster }}
{{- if and $cluster.enabled (or $cluster.s3.accessKeyId (and $cluster.redis.url (include "mirror.redisUrlIsSecret" .))) }}true{{ end }}
{{- end }}

{{/* Checks the cluster values (and config keys the chart sets from them); fails with the value path to fix. */}}
{{- define "mirror.checkCluster" -}}
{{- $cluster := .Values.cluster }}
{{- $fromCluster := dict "storage" "cluster.storage" "redis" "cluster.redis" "cluster" "cluster.advertise (default: the pod's IP)" }}
{{- range $key := keys $fromCluster | sortAlpha }}
{{- if hasKey $.Values.config $key }}
{{- fail (printf "config.%s: the chart sets this from %s" $key (get $fromCluster $key)) }}
{{- end }}
{{- end }}
{{- if kindIs "map" .Values.config.s3 }}
{{- range $key, $value := dict "endpoint" "endpoint" "region" "region" "access_key_id" "accessKeyId" "secret_access_key" "secretAccessKey" }}
{{- if hasKey $.Values.config.s3 $key }}
{{- if has $key (list "access_key_id" "secret_access_key") }}
{{- fail (printf "config.s3.%s: S3 keys never go into the ConfigMap: give cluster.s3.existingSecret, or cluster.s3.accessKeyId and secretAccessKey" $key) }}
{{- end }}
{{- fail (printf "config.s3.%s: the chart sets this from cluster.s3.%s" $key $value) }}
{{- end }}
{{- end }}
{{- end }}
{{- if not $cluster.enabled }}
{{- $given := dict "storage" $cluster.storage "redis.url" $cluster.redis.url "redis.existingSecret" $cluster.redis.existingSecret }}
{{- range $key := keys $given | sortAlpha }}
{{- if get $given $key }}
{{- fail (printf "cluster.%s: only used with cluster.enabled: true" $key) }}
{{- end }}
{{- end }}
{{- else }}
{{- if not $cluster.storage }}
{{- fail "cluster.storage: required with cluster.enabled: the shared bucket, as s3://BUCKET/PREFIX" }}
{{- end }}
{{- if not (regexMatch "^s3://[a-z0-9][a-z0-9.-]{1,61}[a-z0-9](/.*)?$" (toString $cluster.storage)) }}
{{- fail (printf "cluster.storage: expected s3://BUCKET/PREFIX (a bucket name of 3 to 63 lower-case letters, digits, dots and dashes), got %q" (toString $cluster.storage)) }}
{{- end }}
{{- $redis := $cluster.redis }}
{{- if and $redis.url $redis.existingSecret }}
{{- fail "cluster.redis: give either url or existingSecret, not both" }}
{{- end }}
{{- if not (or $redis.url $redis.existingSecret) }}
{{- fail "cluster.redis: required with cluster.enabled: give url (redis://HOST:6379/0) or existingSecret, a Secret holding it" }}
{{- end }}
{{- /* Never repeat the URL: it may hold a password. */}}
{{- if and $redis.url (not (regexMatch "^(rediss?|unix)://." (toString $redis.url))) }}
{{- fail "cluster.redis.url: expected a redis://, rediss:// or unix:// URL" }}
{{- end }}
{{- $s3 := $cluster.s3 }}
{{- if and $s3.existingSecret (or $s3.accessKeyId $s3.secretAccessKey) }}
{{- fail "cluster.s3: give either existingSecret or accessKeyId and secretAccessKey, not both" }}
{{- end }}
{{- if ne (empty $s3.accessKeyId) (empty $s3.secretAccessKey) }}
{{- fail "cluster.s3: accessKeyId and secretAccessKey go together" }}
{{- end }}
{{- if and $s3.endpoint (not (regexMatch "^https?://[^/]+" (toString $s3.endpoint))) }}
{{- fail (printf "cluster.s3.endpoint: expected an http:// or https:// URL, got %q" (toString $s3.endpoint)) }}
{{- end }}
{{- if and $cluster.advertise (not (regexMatch "^https?://[^/]+" (toString $cluster.advertise))) }}
{{- fail (printf "cluster.advertise: expected an http:// or https:// URL, got %q" (toString $cluster.advertise)) }}
{{- end }}
{{- if not (has (toString ($cluster.podAntiAffinity | default "")) (list "soft" "hard" "none" "")) }}
{{- fail (printf "cluster.podAntiAffinity: expected soft, hard or none, got %v" $cluster.podAntiAffinity) }}
{{- end }}
{{- $rolling := $cluster.rollingUpdate | default dict }}
{{- if and (eq (toString ($rolling.maxUnavailable | default 0)) "0") (eq (toString ($rolling.maxSurge | default 0)) "0") }}
{{- fail "cluster.rollingUpdate: maxUnavailable and maxSurge cannot both be 0" }}
{{- end }}
{{- end }}
{{- end }}

{{/*
The environment of a cluster pod: where the shared cache is, how to reach Redis and the bucket,
and the address the other replicas reach this one's internal endpoint at (its pod IP, on the API
port). POD_IP comes first: Kubernetes expands $(POD_IP) only from variables defined before.
*/}}
{{- define "mirror.clusterEnv" -}}
{{- $cluster := .Values.cluster }}
- name: POD_IP
  valueFrom:
    fieldRef:
      fieldPath: status.podIP
- name: MIRROR_ADVERTISE
  value: {{ $cluster.advertise | default (printf "%s://$(POD_IP):5000" (include "mirror.scheme" .)) | quote }}
- name: MIRROR_STORAGE
  value: {{ $cluster.storage | quote }}
- name: MIRROR_REDIS
{{- if $cluster.redis.existingSecret }}
  valueFrom:
    secretKeyRef:
      name: {{ $cluster.redis.existingSecret }}
      key: {{ $cluster.redis.secretKey | default "url" | toJson }}
{{- else if include "mirror.redisUrlIsSecret" . }}
  valueFrom:
    secretKeyRef:
      name: {{ include "mirror.clusterSecretName" . }}
      key: redis-url
{{- else }}
  value: {{ $cluster.redis.url | quote }}
{{- end }}
{{- with $cluster.s3.endpoint }}
- name: AWS_ENDPOINT_URL_S3
  value: {{ . | quote }}
{{- end }}
{{- with $cluster.s3.region }}
- name: AWS_REGION
  value: {{ . | quote }}
{{- end }}
{{- if or $cluster.s3.existingSecret $cluster.s3.accessKeyId }}
{{- $secret := $cluster.s3.existingSecret | default (include "mirror.clusterSecretName" .) }}
- name: AWS_ACCESS_KEY_ID
  valueFrom:
    secretKeyRef:
      name: {{ $secret }}
      key: {{ ternary ($cluster.s3.accessKeyIdKey | default "AWS_ACCESS_KEY_ID") "AWS_ACCESS_KEY_ID" (not (empty $cluster.s3.existingSecret)) | toJson }}
- name: AWS_SECRET_ACCESS_KEY
  valueFrom:
    secretKeyRef:
      name: {{ $secret }}
      key: {{ ternary ($cluster.s3.secretAccessKeyKey | default "AWS_SECRET_ACCESS_KEY") "AWS_SECRET_ACCESS_KEY" (not (empty $cluster.s3.existingSecret)) | toJson }}
{{- end }}
{{- end }}

{{/*
The pods' default affinity in cluster mode (when the affinity value is empty): replicas on
different nodes, preferred (soft) or required (hard), so that one node's loss leaves the others.
*/}}
{{- define "mirror.clusterAffinity" -}}
{{- $mode := toString (.Values.cluster.podAntiAffinity | default "none") }}
{{- if and .Values.cluster.enabled (eq $mode "soft") }}
podAntiAffinity:
  preferredDuringSchedulingIgnoredDuringExecution:
    - weight: 100
      podAffinityTerm:
        topologyKey: kubernetes.io/hostname
        labelSelector:
          matchLabels:
            {{- include "mirror.selectorLabels" . | nindent 12 }}
{{- else if and .Values.cluster.enabled (eq $mode "hard") }}
podAntiAffinity:
  requiredDuringSchedulingIgnoredDuringExecution:
    - topologyKey: kubernetes.io/hostname
      labelSelector:
        matchLabels:
          {{- include "mirror.selectorLabels" . | nindent 10 }}
{{- end }}
{{- end }}

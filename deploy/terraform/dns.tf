# Optional Route 53 records: the sending domains' DKIM, SPF and DMARC TXT records in a public
# zone, and the relay's internal name in a private zone.

locals {
  publish_public = var.public_zone_id != null

  # A TXT record is a list of character-strings of at most 255 octets each (RFC 1035 §3.3.14);
  # a 2048-bit DKIM key is about 400 characters, so it must be split. Verifiers concatenate the
  # strings (RFC 6376 §3.6.2.2). Route 53 takes the strings of one value as "a""b": the provider
  # adds the outer quotes, so joining the chunks with "" yields exactly that.
  dkim_txt = {
    for r in var.dkim_records :
    "${r.selector}._domainkey.${r.domain}" => join("\"\"", [for i in range(0, length(r.value), 255) : substr(r.value, i, 255)])
  }
  spf_txt = {
    for domain, value in var.spf_records :
    domain => join("\"\"", [for i in range(0, length(value), 255) : substr(value, i, 255)])
  }
  dmarc_txt = {
    for domain, value in var.dmarc_records :
    "_dmarc.${domain}" => join("\"\"", [for i in range(0, length(value), 255) : substr(value, i, 255)])
  }
}

resource "aws_route53_record" "dkim" {
  for_each = local.publish_public ? local.dkim_txt : {}

  zone_id = var.public_zone_id
  name    = each.key
  type    = "TXT"
  ttl     = 3600
  records = [each.value]
}

resource "aws_route53_record" "spf" {
  for_each = local.publish_public ? local.spf_txt : {}

  zone_id = var.public_zone_id
  name    = each.key
  type    = "TXT"
  ttl     = 3600
  records = [each.value]
}

resource "aws_route53_record" "dmarc" {
  for_each = local.publish_public ? local.dmarc_txt : {}

  zone_id = var.public_zone_id
  name    = each.key
  type    = "TXT"
  ttl     = 3600
  records = [each.value]
}

resource "aws_route53_record" "internal" {
  count = var.private_zone_id != null ? 1 : 0

  zone_id = var.private_zone_id
  name    = var.private_dns_name
  type    = "A"

  alias {
    name                   = aws_lb.this.dns_name
    zone_id                = aws_lb.this.zone_id
    evaluate_target_health = true
  }

  lifecycle {
    precondition {
      condition     = var.private_dns_name != null
      error_message = "private_dns_name is required when private_zone_id is set."
    }
  }
}
